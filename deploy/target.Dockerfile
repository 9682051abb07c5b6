# syntax=docker/dockerfile:1
# A demo target for compose.yaml: OpenSSH sshd on the private network, user "demo" logging in with the
# key compose mounts at /etc/ssh/authorized_keys/demo. Not for production.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends openssh-server \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --shell /bin/bash demo \
 && usermod --password '*' demo \
 && mkdir -p /run/sshd /etc/ssh/authorized_keys \
 && printf '%s\n' \
      'AuthorizedKeysFile /etc/ssh/authorized_keys/%u' \
      'StrictModes no' \
      'PasswordAuthentication no' \
      'KbdInteractiveAuthentication no' \
      'PermitRootLogin no' \
      'AllowTcpForwarding no' \
      > /etc/ssh/sshd_config.d/demo.conf
EXPOSE 22
HEALTHCHECK --interval=30s --timeout=5s CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/22"]
CMD ["/usr/sbin/sshd", "-D", "-e"]
