-- Purge: remove a child's accesses that occurred before the cutoff (field 3 of the encoded access, epoch ms).
-- KEYS[1] child access log (newest first, up to 1,000); ARGV[1] cutoff epoch ms. Returns the number removed.
-- Accesses are pushed as they occur, so the old ones are normally a run at the tail: one LTRIM. Any old entry out
-- of that order (clocks of several processes) is removed on its own.
local cutoff = tonumber(ARGV[1])
local entries = redis.call('LRANGE', KEYS[1], 0, -1)
local function occurred(entry)
  local s = string.find(entry, '\31', 1, true)
  local t = s and string.find(entry, '\31', s + 1, true)
  local u = t and string.find(entry, '\31', t + 1, true)
  return u and tonumber(string.sub(entry, t + 1, u - 1))
end
local keep = #entries  -- entries[1..keep] stay after trimming the old tail
while keep > 0 do
  local at = occurred(entries[keep])
  if not (at and at < cutoff) then break end
  keep = keep - 1
end
local removed = #entries - keep
if removed == #entries and removed > 0 then
  redis.call('DEL', KEYS[1])
elseif removed > 0 then
  redis.call('LTRIM', KEYS[1], 0, keep - 1)
end
for i = 1, keep do
  local at = occurred(entries[i])
  if at and at < cutoff then
    removed = removed + redis.call('LREM', KEYS[1], 1, entries[i])
  end
end
return removed
