-- Erase one record entered in error: remove it and its index entry, queue the entered-in-error Flag, audit it.
-- KEYS[1] LA ids hash, KEYS[2] child records hash, KEYS[3] sync queue, KEYS[4] sync schedule, KEYS[5] audit list
-- ARGV[1] la, ARGV[2] localId, ARGV[3] expected nhs, ARGV[4] sync on, ARGV[5] audit JSON
-- Returns 1 when erased, 0 when the record is absent, -1 when the index moved (retry).
local la, lid, expected = ARGV[1], ARGV[2], ARGV[3]
local current = redis.call('HGET', KEYS[1], lid)
if not current then return 0 end
if current ~= expected then return -1 end
local field = la .. '|' .. lid
local rec = redis.call('HGET', KEYS[2], field)
redis.call('HDEL', KEYS[2], field)
redis.call('HDEL', KEYS[1], lid)
redis.call('ZREM', KEYS[4], field)
if ARGV[4] == '1' and rec then
  redis.call('XADD', KEYS[3], '*', 'la', la, 'lid', lid, 't', rec)
end
redis.call('LPUSH', KEYS[5], ARGV[5])
return 1
