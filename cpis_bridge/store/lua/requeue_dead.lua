-- Re-queue one dead letter (ops): a notification channel goes back on the delivery queue with a fresh age, a
-- flag-sync letter back on the sync queue; the dead letter is removed. KEYS[1] dead stream, KEYS[2] notify
-- queue, KEYS[3] sync queue; ARGV[1] dead-letter id, ARGV[2] now (epoch ms). Returns 1, or 0 when unknown.
local found = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #found == 0 then return 0 end
local raw, m = found[1][2], {}
for i = 1, #raw, 2 do m[raw[i]] = raw[i + 1] end
if m.channel == 'flag-sync' then
  if m.t and m.t ~= '' then
    redis.call('XADD', KEYS[3], '*', 'la', m.la, 'lid', m.lid, 't', m.t)
  else
    redis.call('XADD', KEYS[3], '*', 'la', m.la, 'lid', m.lid)
  end
else
  redis.call('XADD', KEYS[2], '*', 'la', m.la, 'ref', m.ref, 'ch', m.channel, 'n', '0', 't0', ARGV[2], 'c4', '0')
end
redis.call('XDEL', KEYS[1], ARGV[1])
return 1
