-- Purge: delete acknowledged inbox entries (given, all older than the cutoff) from the stream and the ack set.
-- KEYS[1] inbox stream, KEYS[2] ack set, KEYS[3] who acknowledged each; ARGV: entry ids. Returns the number of stream entries deleted.
local deleted = 0
for _, id in ipairs(ARGV) do
  if redis.call('SISMEMBER', KEYS[2], id) == 1 then
    deleted = deleted + redis.call('XDEL', KEYS[1], id)
    redis.call('SREM', KEYS[2], id)
    redis.call('HDEL', KEYS[3], id)
  end
end
return deleted
