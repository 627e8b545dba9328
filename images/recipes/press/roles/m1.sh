# m1: database (MariaDB), listening on the namespace network.
apt-get install -y --no-install-recommends mariadb-server
sed -i 's/^bind-address.*/bind-address = 0.0.0.0/' /etc/mysql/mariadb.conf.d/50-server.cnf
systemctl enable mariadb
