# n1: proxy (nginx), like Press's proxy server.
apt-get install -y --no-install-recommends nginx
systemctl enable nginx
