-- One row that readiness checks rewrite: a write that succeeds proves the database takes writes now
-- (a ping only proves it answers reads; a full disk or a lost writer connection still answers them).
CREATE TABLE write_probe (id INTEGER PRIMARY KEY, written_at TEXT NOT NULL);
INSERT INTO write_probe (id, written_at) VALUES (1, '')
