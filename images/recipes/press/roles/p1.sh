# p1: monitor. Prometheus (+ node exporter) are Debian packages; Grafana is not in Debian: install an
# operator-provided .deb here if wanted (drop it in /root/grafana.deb before running build.sh).
apt-get install -y --no-install-recommends prometheus prometheus-node-exporter
systemctl enable prometheus prometheus-node-exporter
if [ -f /root/grafana.deb ]; then apt-get install -y /root/grafana.deb && systemctl enable grafana-server; fi
