#!/bin/sh
# Container entry point: on `serve`, create what is missing in $BASTION_HOME, then, when the compose file
# mounts them, add the demo user's key (/run/bastion/bootstrap.pub) and apply a policy
# (/run/bastion/policy.toml). Both are idempotent, so every restart is the same. Any other command
# (`docker compose exec bastion bastion-entrypoint user list`) runs the CLI as is.
set -eu

if [ "${1:-serve}" = serve ]; then
    bastion init >/dev/null
    if [ -f /run/bastion/bootstrap.pub ]; then
        bastion user add "${BASTION_BOOTSTRAP_USER:-demo}" --key /run/bastion/bootstrap.pub
    fi
    if [ -f /run/bastion/policy.toml ]; then
        bastion policy apply /run/bastion/policy.toml
    fi
fi
exec bastion "$@"
