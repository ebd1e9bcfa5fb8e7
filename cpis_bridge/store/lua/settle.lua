-- Settle one delivery-queue entry in one atomic step: acknowledge and drop it, schedule its retries, write its
-- dead letters, set aside the channels whose endpoint cannot take them now, and index its notification id.
-- Nothing is written when another consumer settled it first.
-- KEYS[1] queue stream, KEYS[2] delay zset, KEYS[3] dead-letter stream, KEYS[4] the LA's inbox index hash,
-- KEYS[5] held-endpoint index set, KEYS[5 + j] the held zset of the j-th hold.
-- ARGV[1] group, ARGV[2] entry id, ARGV[3] notification id ('' = none), ARGV[4] inbox ref,
-- ARGV[5] n retries, then per retry: due (epoch ms), member (JSON array of stream fields);
-- then n dead letters, then per dead letter: k, then k field/value pairs;
-- then n holds, then per hold: score (epoch ms first queued), member, index member ("<channel>:<la>").
-- Returns 1 when settled, 0 when the entry was no longer pending.
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('XDEL', KEYS[1], ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[4], ARGV[3], ARGV[4]) end
local i = 5
local nr = tonumber(ARGV[i]); i = i + 1
for _ = 1, nr do
  redis.call('ZADD', KEYS[2], ARGV[i], ARGV[i + 1])
  i = i + 2
end
local nd = tonumber(ARGV[i]); i = i + 1
for _ = 1, nd do
  local k = tonumber(ARGV[i]); i = i + 1
  local f = {}
  for j = 0, 2 * k - 1 do f[#f + 1] = ARGV[i + j] end
  i = i + 2 * k
  redis.call('XADD', KEYS[3], '*', unpack(f))
end
local nh = tonumber(ARGV[i] or '0'); i = i + 1
for j = 1, nh do
  redis.call('ZADD', KEYS[5 + j], ARGV[i], ARGV[i + 1])
  redis.call('SADD', KEYS[5], ARGV[i + 2])
  i = i + 3
end
return 1
