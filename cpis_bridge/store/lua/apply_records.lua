-- Create, replace or end a batch of one LA's records, each with its sync-queue entry, its schedule entry and its
-- audit entry, in one atomic step. A record identical to the stored one is left alone (no version, no sync).
-- KEYS[1] LA ids hash, KEYS[2] sync queue, KEYS[3] sync schedule, KEYS[4] the LA's upload lease.
-- ARGV[1] la, ARGV[2] now (ISO instant), ARGV[3] sync on ('1'/'0'), ARGV[4] n, ARGV[5] the records: 9 fields per
--   record, all joined by \x1f: localId, nhs, expected current nhs ('' = none, '*' = none or this nhs), record
--   JSON (no v/u), schedule day ('' = none), audit JSON, new child records hash, old child records hash (same as new
--   when the NHS number is unchanged), audit list. (The per-child keys travel in the payload: a batch spans many
--   children and so many slots, and thousands of separate arguments cost the client more than the script costs.)
-- ARGV[6] an upload's lease token ('' = none): the batch is refused (error LEASE) unless that token holds the lease.
-- ARGV[7] '1' to answer each record as stored too (a single put: no read-back), else '0' or absent.
-- Returns a flat array: per record a code (C created, M modified, U unchanged, R retry: the index moved) and
-- the resulting version; with ARGV[7] '1' also the stored record JSON ('' for R).
-- Stored form: the record JSON as sent with ',"v":<version>,"u":"<now>"' appended inside the braces, so the hot
-- path needs no JSON decoding: a record is unchanged when the stored text up to that suffix equals the new JSON.
-- Records stored in any other layout (e.g. re-encoded elsewhere) fall back to a field-by-field comparison.
local la, now, sync_on, n = ARGV[1], ARGV[2], ARGV[3] == '1', tonumber(ARGV[4])
local answer_stored = ARGV[7] == '1'
if ARGV[6] ~= '' and redis.call('GET', KEYS[4]) ~= ARGV[6] then
  return redis.error_reply('LEASE the upload lease is no longer held')
end
local compared = {'p', 'n', 'b', 's', 'g', 'f', 'e', 'd', 'x', 'l'}
local out = {}
local payload, pos = ARGV[5], 1

local function next_field()
  local stop = string.find(payload, '\31', pos, true)
  local value
  if stop then
    value = string.sub(payload, pos, stop - 1)
    pos = stop + 1
  else
    value = string.sub(payload, pos)
    pos = #payload + 2
  end
  return value
end

-- (body, version) of a stored record in the appended layout, or nil.
local function split_stored(stored)
  local at = string.find(stored, ',"v":', 1, true)
  if at == nil then return nil end
  local version = string.match(stored, '^,"v":(%d+),"u":"[^"]*"}$', at)
  if version == nil then return nil end
  return string.sub(stored, 1, at - 1), tonumber(version)
end

for i = 1, n do
  local lid, nhs, expected, json, sched = next_field(), next_field(), next_field(), next_field(), next_field()
  local audit, new_hash, old_hash, audit_key = next_field(), next_field(), next_field(), next_field()
  local field = la .. '|' .. lid
  local current = redis.call('HGET', KEYS[1], lid) or ''
  local as_expected = current == expected
  if expected == '*' then as_expected = current == '' or current == nhs end
  if not as_expected then
    out[#out + 1] = 'R'; out[#out + 1] = 0
    if answer_stored then out[#out + 1] = '' end
  else
    local body = string.sub(json, 1, -2)
    local version, code = 1, 'C'
    local unchanged = false
    local old_json = false
    if current ~= '' then
      old_json = redis.call('HGET', old_hash, field)
      if old_json then
        code = 'M'
        local old_body, old_version = split_stored(old_json)
        if old_body ~= nil then
          unchanged = current == nhs and old_body == body
        else
          local old = cjson.decode(old_json)
          old_version = tonumber(old.v) or 0
          if current == nhs then
            local rec = cjson.decode(json)
            unchanged = true
            for _, key in ipairs(compared) do
              if old[key] ~= rec[key] then unchanged = false; break end
            end
          end
        end
        version = old_version + 1
        if unchanged then version = old_version end
      end
    end
    if unchanged then
      out[#out + 1] = 'U'; out[#out + 1] = version
      if answer_stored then out[#out + 1] = old_json end
    else
      if current ~= '' and current ~= nhs then redis.call('HDEL', old_hash, field) end
      local stored = body .. ',"v":' .. version .. ',"u":"' .. now .. '"}'
      redis.call('HSET', new_hash, field, stored)
      if current ~= nhs then redis.call('HSET', KEYS[1], lid, nhs) end
      if sync_on then
        redis.call('XADD', KEYS[2], '*', 'la', la, 'lid', lid)
        if sched ~= '' then redis.call('ZADD', KEYS[3], sched, field) else redis.call('ZREM', KEYS[3], field) end
      end
      redis.call('LPUSH', audit_key, audit)
      out[#out + 1] = code; out[#out + 1] = version
      if answer_stored then out[#out + 1] = stored end
    end
  end
end
return out
