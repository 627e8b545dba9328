"""The press app server stand-in (f1): a WSGI app from Debian packages only (gunicorn, pymysql, redis).

GET /        the sites read from m1's `press` database and a hit counter kept in Redis (text/plain)
GET /health  200 `ok sites=N hits=N` when both MariaDB (m1) and Redis answer, else 503
Host `<site>.<namespace>.fcdev` shows that site's row.
"""
import pymysql
import redis

DB = dict(host="m1", user="press", password="press", database="press", connect_timeout=3, read_timeout=3)


def _sites():
    conn = pymysql.connect(**DB)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT s.name, b.name, s.status, COUNT(k.id) FROM site s JOIN bench b ON b.id = s.bench "
                "LEFT JOIN backup k ON k.site = s.id GROUP BY s.id ORDER BY s.name"
            )
            return cur.fetchall()
    finally:
        conn.close()


def _hits():
    return redis.Redis(host="127.0.0.1", socket_timeout=3).incr("hits")


def application(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    host = environ.get("HTTP_HOST", "").split(":")[0]
    try:
        sites = _sites()
        hits = _hits()
    except Exception as e:  # noqa: BLE001 - the health answer names what failed
        start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
        return [f"unavailable: {type(e).__name__}: {e}\n".encode()]
    if path == "/health":
        body = f"ok sites={len(sites)} hits={hits}\n"
    elif path == "/":
        label = host.split(".")[0]
        chosen = [s for s in sites if s[0].split(".")[0] == label]
        rows = chosen or sites
        body = "press on fcdev: sites from m1\n" + "".join(
            f"site {name} bench {bench} status {status} backups {n}\n" for name, bench, status, n in rows
        ) + f"hits {hits}\n"
    else:
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body.encode()]
