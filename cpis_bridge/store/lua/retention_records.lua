-- Purge: delete records past retention, each only if unchanged since the scan (same version), with its LA index
-- entry (when it still points at this child), its sync schedule entry and an audit entry on the child.
-- KEYS[1] sync schedule; then per record i (base 1 + 3(i-1)): child records hash, LA ids hash, child audit list.
-- ARGV[1] n, ARGV[2] audit JSON template; then per record (base 2 + 4(i-1)): field, localId, nhs, version.
-- Returns the number of records deleted.
local n, audit = tonumber(ARGV[1]), ARGV[2]
local deleted = 0
for i = 1, n do
  local k = 1 + 3 * (i - 1)
  local a = 2 + 4 * (i - 1)
  local field, lid, nhs, version = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], tonumber(ARGV[a + 4])
  local raw = redis.call('HGET', KEYS[k + 1], field)
  if raw then
    local rec = cjson.decode(raw)
    if (tonumber(rec.v) or 0) == version then
      redis.call('HDEL', KEYS[k + 1], field)
      if redis.call('HGET', KEYS[k + 2], lid) == nhs then redis.call('HDEL', KEYS[k + 2], lid) end
      redis.call('ZREM', KEYS[1], field)
      local entry = cjson.decode(audit)
      entry.nhsNumber = nhs
      entry.detail = {la = string.sub(field, 1, string.find(field, '|', 1, true) - 1), localId = lid}
      redis.call('LPUSH', KEYS[k + 3], cjson.encode(entry))
      deleted = deleted + 1
    end
  end
end
return deleted
