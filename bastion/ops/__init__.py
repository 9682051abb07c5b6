"""Admin tasks built on the library: doctor, quickstart, ssh-config, backup."""
