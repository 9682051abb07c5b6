"""The gateway's lifecycle: home and host keys, start/stop/reload, workers, the control socket."""
