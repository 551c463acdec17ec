-- Runs once, when the primary's data directory is first created (docker-entrypoint-initdb.d),
-- after the image created the app and replication users. Replicated to the replica.
-- dbrouter's monitor reads SHOW REPLICA STATUS for replica lag.
GRANT REPLICA MONITOR ON *.* TO 'app'@'%';
