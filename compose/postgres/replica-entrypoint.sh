#!/usr/bin/env bash
# A PostgreSQL hot standby: on the first start, clone the primary with pg_basebackup
# (-R writes standby.signal and primary_conninfo); then start as the image always does.
set -euo pipefail

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    mkdir -p "$PGDATA"
    chown postgres:postgres "$PGDATA"
    chmod 0700 "$PGDATA"
    until gosu postgres pg_isready -h "$PRIMARY_HOST" -p "$PRIMARY_PORT" -q; do
        echo "waiting for the primary at $PRIMARY_HOST:$PRIMARY_PORT"
        sleep 1
    done
    echo "cloning $PRIMARY_HOST:$PRIMARY_PORT into $PGDATA"
    PGPASSWORD="$REPLICATION_PASSWORD" gosu postgres pg_basebackup \
        --host="$PRIMARY_HOST" --port="$PRIMARY_PORT" --username="$REPLICATION_USER" \
        --pgdata="$PGDATA" --wal-method=stream --write-recovery-conf --checkpoint=fast --no-password
fi

exec docker-entrypoint.sh "$@"
