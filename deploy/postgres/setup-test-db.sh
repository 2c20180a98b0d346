#!/usr/bin/env bash
# Brings up the local PostgreSQL server the tests use and the role/database they expect:
#   postgres://hive:hive@127.0.0.1:5432/hive_test   (role hive: LOGIN, CREATEDB)
# Tests create their own throw-away databases with that role, hence CREATEDB.
# Idempotent: an existing cluster, role or database is reused. Debian's postgresql-common
# (pg_lsclusters, pg_createcluster, pg_ctlcluster) manages the server; no systemd needed.
set -euo pipefail

usage() {
  cat <<USAGE
Usage: $(basename "$0") [--print-url]

Start (creating if needed) the Debian PostgreSQL cluster on 127.0.0.1:5432 and make sure role
'hive' (password 'hive', CREATEDB) and database 'hive_test' exist. Prints
  export HIVE_TEST_POSTGRES_URL=postgres://hive:hive@127.0.0.1:5432/hive_test
Needs root and the 'postgresql' package. For production set-up see deploy/postgres/README.md.
USAGE
}
die() { echo "setup-test-db: error: $*" >&2; exit 1; }
log() { echo "setup-test-db: $*" >&2; }

case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  ""|--print-url) ;;
  *) die "unknown argument '$1' (see --help)" ;;
esac
[ "$(id -u)" = 0 ] || die "must run as root"
command -v pg_lsclusters >/dev/null || die "postgresql-common not installed (apt-get install postgresql)"

# The newest installed major version.
version="$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf "%f\n" 2>/dev/null | sort -n | tail -n1)"
[ -n "$version" ] || die "no PostgreSQL server under /usr/lib/postgresql (apt-get install postgresql)"

if ! pg_lsclusters -h | awk -v v="$version" '$1==v && $2=="main"' | grep -q .; then
  log "creating cluster $version/main"
  pg_createcluster --port 5432 "$version" main >&2
fi
port="$(pg_lsclusters -h | awk -v v="$version" '$1==v && $2=="main" {print $3}')"
[ "$port" = 5432 ] || die "cluster $version/main is on port $port, expected 5432"
if ! pg_lsclusters -h | awk -v v="$version" '$1==v && $2=="main" {print $4}' | grep -q online; then
  log "starting cluster $version/main"
  pg_ctlcluster "$version" main start >&2
fi
for _ in $(seq 100); do
  pg_isready -q -h 127.0.0.1 -p 5432 && break
  sleep 0.1
done
pg_isready -q -h 127.0.0.1 -p 5432 || die "PostgreSQL did not accept connections on 127.0.0.1:5432"

psql_admin() { su postgres -c "psql -X -q -v ON_ERROR_STOP=1 -d postgres $*"; }
psql_admin "-f -" <<'SQL'
DO $$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'hive') THEN
    CREATE ROLE hive LOGIN PASSWORD 'hive' CREATEDB;
  ELSE
    ALTER ROLE hive LOGIN PASSWORD 'hive' CREATEDB;
  END IF;
  -- Production timeouts (setup.sql) must not leak into the test role.
  ALTER ROLE hive RESET ALL;
END
$$;
SQL
if ! su postgres -c "psql -X -tA -d postgres -c \"SELECT 1 FROM pg_database WHERE datname = 'hive_test'\"" | grep -q 1; then
  psql_admin "-c 'CREATE DATABASE hive_test OWNER hive'"
fi
# A test that panics never drops its database (hive_t_<uuid>); drop those older than three hours
# (a running suite's are younger), so they do not pile up run after run.
stale="$(su postgres -c "psql -X -tA -d postgres -c \"SELECT datname FROM pg_database WHERE datname LIKE 'hive\\_t\\_%' AND (pg_stat_file('base/' || oid || '/PG_VERSION')).modification < now() - interval '3 hours'\"")" || stale=""
n=0
for db in $stale; do
  case "$db" in hive_t_*) ;; *) continue ;; esac
  su postgres -c "psql -X -q -d postgres -c 'DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)'" >/dev/null 2>&1 && n=$((n + 1))
done
[ "$n" = 0 ] || log "dropped $n test databases left over by earlier runs"
url="postgres://hive:hive@127.0.0.1:5432/hive_test"
# Prove the URL works the way the tests will use it: TCP, password auth, CREATEDB.
PGPASSWORD=hive psql -X -q -h 127.0.0.1 -U hive -d hive_test -v ON_ERROR_STOP=1 \
  -c "SELECT 1" >/dev/null || die "cannot log in as hive on 127.0.0.1:5432/hive_test"
echo "export HIVE_TEST_POSTGRES_URL=$url"
