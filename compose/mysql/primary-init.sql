-- Runs once, when the primary's data directory is first created (docker-entrypoint-initdb.d),
-- after the image created the app user. Replicated to the replica like everything else.
CREATE USER 'repl'@'%' IDENTIFIED BY 'repl-secret';
GRANT REPLICATION SLAVE ON *.* TO 'repl'@'%';
-- dbrouter's monitor reads SHOW REPLICA STATUS for replica lag.
GRANT REPLICATION CLIENT ON *.* TO 'app'@'%';
