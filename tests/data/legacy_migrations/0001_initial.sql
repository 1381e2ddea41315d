-- Conversations and their messages. Portable SQL: runs on SQLite and PostgreSQL.
-- Money is TEXT holding an exact decimal; timestamps are ISO 8601 UTC text.
CREATE TABLE conversations (
    id TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL,
    title TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);

CREATE TABLE messages (
    id TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL REFERENCES conversations(id),
    seq INTEGER NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    thinking TEXT NOT NULL DEFAULT '',
    model TEXT,
    status TEXT NOT NULL,
    stop_reason TEXT,
    input_tokens BIGINT NOT NULL DEFAULT 0,
    output_tokens BIGINT NOT NULL DEFAULT 0,
    cache_creation_input_tokens BIGINT NOT NULL DEFAULT 0,
    cache_read_input_tokens BIGINT NOT NULL DEFAULT 0,
    cost TEXT,
    cost_estimated INTEGER NOT NULL DEFAULT 0,
    error_code TEXT,
    stream_id TEXT,
    trace_session_id TEXT,
    task_trace_id TEXT,
    created_at TEXT NOT NULL,
    completed_at TEXT
);

CREATE UNIQUE INDEX messages_conversation_seq ON messages (conversation_id, seq);
CREATE INDEX messages_status ON messages (status);
CREATE INDEX conversations_updated ON conversations (updated_at);
