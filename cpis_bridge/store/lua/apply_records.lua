-- Create, replace or end a batch of one LA's records, each with its sync-queue entry, its schedule entry and its
-- audit entry, in one atomic step. A record identical to the stored one is left alone (no version, no sync).
-- KEYS[1] LA ids hash, KEYS[2] sync queue, KEYS[3] sync schedule; then per record i (base 3 + 3(i-1)):
--   new child records hash, old child records hash (same as new when the NHS number is unchanged), audit list.
-- ARGV[1] la, ARGV[2] now (ISO instant), ARGV[3] sync on ('1'/'0'), ARGV[4] n; then per record (base 4 + 6(i-1)):
--   localId, nhs, expected current nhs ('' = none), record JSON (no v/u), schedule day ('' = none), audit JSON.
-- Returns a flat array: per record a code (C created, M modified, U unchanged, R retry: the index moved) and
-- the resulting version.
local la, now, sync_on, n = ARGV[1], ARGV[2], ARGV[3] == '1', tonumber(ARGV[4])
local compared = {'p', 'n', 'b', 's', 'g', 'f', 'e', 'd', 'x', 'l'}
local out = {}
for i = 1, n do
  local a = 4 + 6 * (i - 1)
  local k = 3 + 3 * (i - 1)
  local lid, nhs, expected, json, sched, audit = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5], ARGV[a + 6]
  local new_hash, old_hash, audit_key = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  local field = la .. '|' .. lid
  local current = redis.call('HGET', KEYS[1], lid) or ''
  if current ~= expected then
    out[#out + 1] = 'R'; out[#out + 1] = 0
  else
    local rec = cjson.decode(json)
    local version, code = 1, 'C'
    local unchanged = false
    if current ~= '' then
      local old_json = redis.call('HGET', old_hash, field)
      if old_json then
        local old = cjson.decode(old_json)
        version = (tonumber(old.v) or 0) + 1
        code = 'M'
        if current == nhs then
          unchanged = true
          for _, key in ipairs(compared) do
            if old[key] ~= rec[key] then unchanged = false; break end
          end
          if unchanged then version = tonumber(old.v) or 0 end
        end
      end
    end
    if unchanged then
      out[#out + 1] = 'U'; out[#out + 1] = version
    else
      if current ~= '' and current ~= nhs then redis.call('HDEL', old_hash, field) end
      rec.v = version
      rec.u = now
      redis.call('HSET', new_hash, field, cjson.encode(rec))
      redis.call('HSET', KEYS[1], lid, nhs)
      if sync_on then
        redis.call('XADD', KEYS[2], '*', 'la', la, 'lid', lid)
        if sched ~= '' then redis.call('ZADD', KEYS[3], sched, field) else redis.call('ZREM', KEYS[3], field) end
      end
      redis.call('LPUSH', audit_key, audit)
      out[#out + 1] = code; out[#out + 1] = version
    end
  end
end
return out
