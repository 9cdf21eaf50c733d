# Sourced once by the postgres image's entry point on a new cluster (/docker-entrypoint-initdb.d):
# the schema owner, the workers' role and the database the owner owns, as the postgresql role
# makes them. The migrate service then creates the schema as the owner and grants the workers'
# role DML alone (flowworker db upgrade --grant-to flow_worker); no role gets DDL it does not own.
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -v owner_password="$FLOWWORKER_OWNER_PASSWORD" -v worker_password="$FLOWWORKER_WORKER_PASSWORD" <<'SQL'
CREATE ROLE flow_owner LOGIN PASSWORD :'owner_password';
CREATE ROLE flow_worker LOGIN PASSWORD :'worker_password';
CREATE DATABASE flows OWNER flow_owner;
REVOKE ALL ON DATABASE flows FROM PUBLIC;
GRANT CONNECT ON DATABASE flows TO flow_worker;
SQL
