-- Runs once, when the replica's data directory is first created (docker-entrypoint-initdb.d).
-- GTID auto-positioning fetches everything the primary has written since it was created,
-- including the app database, the app user and its grants. GET_SOURCE_PUBLIC_KEY lets
-- caching_sha2_password authenticate without TLS.
CHANGE REPLICATION SOURCE TO
    SOURCE_HOST = 'mysql-primary',
    SOURCE_PORT = 3306,
    SOURCE_USER = 'repl',
    SOURCE_PASSWORD = 'repl-secret',
    SOURCE_AUTO_POSITION = 1,
    SOURCE_CONNECT_RETRY = 5,
    GET_SOURCE_PUBLIC_KEY = 1;
START REPLICA;
