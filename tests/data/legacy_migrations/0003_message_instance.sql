-- Which server instance generates a message while it is `streaming`: with several instances sharing this
-- database, a starting or surviving instance interrupts only the answers of instances that are gone.
-- Independent of 0002; NULL for answers written before this migration (they count as gone).
ALTER TABLE messages ADD COLUMN instance_id TEXT;
