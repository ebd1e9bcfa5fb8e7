-- Move delivery retries whose time has come from the delay zset back onto the queue stream, atomically, so a
-- retry is never lost nor queued twice. KEYS[1] delay zset, KEYS[2] queue stream; ARGV[1] now (epoch ms),
-- ARGV[2] limit. Members are JSON arrays of the stream fields. Returns how many were moved.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
  redis.call('XADD', KEYS[2], '*', unpack(cjson.decode(member)))
  redis.call('ZREM', KEYS[1], member)
end
return #due
