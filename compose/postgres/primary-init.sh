#!/usr/bin/env bash
# Runs once, when the primary's data directory is first created (docker-entrypoint-initdb.d):
# a role for the replicas' streaming connections, and the pg_hba.conf line that lets it in
# (the image's own line, "host all all all scram-sha-256", does not cover replication).
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    --set=user="$REPLICATION_USER" --set=password="$REPLICATION_PASSWORD" <<-'EOSQL'
	CREATE ROLE :"user" WITH REPLICATION LOGIN PASSWORD :'password';
EOSQL
echo "host replication $REPLICATION_USER all scram-sha-256" >> "$PGDATA/pg_hba.conf"
