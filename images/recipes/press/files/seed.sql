-- The onboarding data of the press cluster (m1): a stand-in for Press's onboarding backup.
CREATE DATABASE IF NOT EXISTS press;
USE press;
CREATE TABLE IF NOT EXISTS bench (id INT PRIMARY KEY, name VARCHAR(64) NOT NULL, server VARCHAR(64) NOT NULL,
  python VARCHAR(16) NOT NULL);
CREATE TABLE IF NOT EXISTS site (id INT PRIMARY KEY AUTO_INCREMENT, name VARCHAR(128) NOT NULL UNIQUE,
  bench INT NOT NULL, status VARCHAR(16) NOT NULL);
CREATE TABLE IF NOT EXISTS domain (id INT PRIMARY KEY AUTO_INCREMENT, site INT NOT NULL,
  domain VARCHAR(128) NOT NULL);
CREATE TABLE IF NOT EXISTS backup (id INT PRIMARY KEY AUTO_INCREMENT, site INT NOT NULL,
  created DATETIME NOT NULL, size_mb INT NOT NULL, path VARCHAR(255) NOT NULL);
INSERT IGNORE INTO bench VALUES (1, 'bench-0001', 'f1', '3.11'), (2, 'bench-0002', 'f1', '3.11');
INSERT IGNORE INTO site (id, name, bench, status) VALUES
  (1, 'alpha.fcdev.local', 1, 'Active'), (2, 'beta.fcdev.local', 1, 'Active'), (3, 'gamma.fcdev.local', 2, 'Broken');
INSERT IGNORE INTO domain (id, site, domain) VALUES (1, 1, 'alpha.example.com'), (2, 2, 'beta.example.com');
INSERT IGNORE INTO backup (id, site, created, size_mb, path) VALUES
  (1, 1, '2026-11-01 03:00:00', 42, '/backups/alpha-20261101.sql.gz'),
  (2, 1, '2026-11-02 03:00:00', 43, '/backups/alpha-20261102.sql.gz'),
  (3, 2, '2026-11-02 03:00:00', 17, '/backups/beta-20261102.sql.gz');
-- The engineer's user (shown by `fcdev images` and docs/images.md) and the readiness probe's user (no rights).
CREATE USER IF NOT EXISTS 'press'@'%' IDENTIFIED BY 'press';
GRANT ALL ON press.* TO 'press'@'%';
CREATE USER IF NOT EXISTS 'fcdev_probe'@'%';
FLUSH PRIVILEGES;
