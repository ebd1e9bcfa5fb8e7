-- Put entries held aside for one endpoint back on the delivery queue, atomically (never lost, never queued
-- twice): every one first queued at or before ARGV[2] (past the maximum age: the relay dead-letters it without an
-- attempt), up to ARGV[4] of them, then the ARGV[1] oldest others. The endpoint leaves the index when none is left.
-- KEYS[1] held zset (score: epoch ms first queued; member: JSON array of stream fields), KEYS[2] queue stream,
-- KEYS[3] held-endpoint index set; ARGV[3] the endpoint's index member. Returns how many are still held.
local function back(members)
  for _, member in ipairs(members) do
    redis.call('XADD', KEYS[2], '*', unpack(cjson.decode(member)))
    redis.call('ZREM', KEYS[1], member)
  end
end
back(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[4])))
local n = tonumber(ARGV[1])
if n > 0 then back(redis.call('ZRANGE', KEYS[1], 0, n - 1)) end
local left = redis.call('ZCARD', KEYS[1])
if left == 0 then redis.call('SREM', KEYS[3], ARGV[3]) end
return left
