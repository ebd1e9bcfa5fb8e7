-- One LA's upload lease and journal: every step runs only while the caller's token still holds the lease, so a
-- process that stalled past its lease can never write over the upload that took over.
-- KEYS[1] lease, KEYS[2] journal entry, KEYS[3] journal body (list of chunks), KEYS[4] reports hash,
-- KEYS[5] last applied sequence.
-- ARGV[1] step, ARGV[2] token; then per step: renew: ttl ms; push: chunk, '1' when it is the first;
-- commit: the entry; finish: sequence, report ('' = none: the sequence is not used up).
-- Returns 1, or 0 when the token does not hold the lease.
if redis.call('GET', KEYS[1]) ~= ARGV[2] then return 0 end
local step = ARGV[1]
if step == 'renew' then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
elseif step == 'release' then
  redis.call('DEL', KEYS[1])
elseif step == 'push' then
  if ARGV[4] == '1' then redis.call('DEL', KEYS[2], KEYS[3]) end
  redis.call('RPUSH', KEYS[3], ARGV[3])
  redis.call('PEXPIRE', KEYS[3], 3600000)  -- a body never committed (its upload died) goes by itself
elseif step == 'commit' then
  redis.call('SET', KEYS[2], ARGV[3])
  redis.call('PERSIST', KEYS[3])
elseif step == 'finish' then
  if ARGV[4] ~= '' then
    redis.call('HSET', KEYS[4], ARGV[3], ARGV[4])
    local last = tonumber(redis.call('GET', KEYS[5]) or '0')
    if tonumber(ARGV[3]) > last then redis.call('SET', KEYS[5], ARGV[3]) end
  end
  redis.call('DEL', KEYS[2], KEYS[3])
else
  return redis.error_reply('unknown step ' .. step)
end
return 1
