# r1: container registry (Debian's docker-registry, the CNCF distribution registry) on :5000.
apt-get install -y --no-install-recommends docker-registry
systemctl enable docker-registry
