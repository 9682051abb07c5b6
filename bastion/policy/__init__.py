"""Who may reach what: the rule model, the pure decisions, the network guard, limits, policy files."""
