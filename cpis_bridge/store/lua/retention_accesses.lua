-- Purge: remove a child's accesses that occurred before the cutoff (field 3 of the encoded access, epoch ms).
-- KEYS[1] child access list; ARGV[1] cutoff epoch ms. Returns the number removed.
local cutoff = tonumber(ARGV[1])
local removed = 0
for _, entry in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  local s = string.find(entry, '\31', 1, true)
  local t = s and string.find(entry, '\31', s + 1, true)
  local u = t and string.find(entry, '\31', t + 1, true)
  local occurred = u and tonumber(string.sub(entry, t + 1, u - 1))
  if occurred and occurred < cutoff then
    removed = removed + redis.call('LREM', KEYS[1], 1, entry)
  end
end
return removed
