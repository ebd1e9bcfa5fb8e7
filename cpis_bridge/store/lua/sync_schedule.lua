-- Time-driven Flag status: move the records whose visibility has ended (schedule score <= today's epoch day)
-- into the sync queue, in one atomic step so several service processes never move one member twice.
-- KEYS[1] sync schedule zset ("<la>|<localId>" -> epoch day), KEYS[2] sync queue stream
-- ARGV[1] today's epoch day (Europe/London), ARGV[2] at most this many members. Returns how many moved.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
  local bar = string.find(member, '|', 1, true)
  if bar then
    redis.call('XADD', KEYS[2], '*', 'la', string.sub(member, 1, bar - 1), 'lid', string.sub(member, bar + 1))
  end
  redis.call('ZREM', KEYS[1], member)
end
return #due
