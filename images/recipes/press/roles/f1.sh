# f1: app server (benches and sites): Python, Redis, Node and the bench toolchain from Debian packages.
apt-get install -y --no-install-recommends \
  python3 python3-venv python3-dev python3-pip build-essential git curl \
  redis-server nodejs npm mariadb-client libmariadb-dev pkg-config \
  wkhtmltopdf fontconfig xvfb supervisor cron sudo
systemctl enable redis-server supervisor
useradd -m -s /bin/bash frappe || true
# The bench CLI itself comes from PyPI in Press; operators who accept that source install it in the snapshot:
#   sudo -u frappe python3 -m venv /home/frappe/env && /home/frappe/env/bin/pip install frappe-bench
