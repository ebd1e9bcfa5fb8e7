-- Shared helpers prepended to every script (store/scripts.py): calendar days and the visibility rule.
local function days(s)
  if s == nil or s == '' or s == cjson.null then return nil end
  local y = tonumber(string.sub(s, 1, 4))
  local m = tonumber(string.sub(s, 6, 7))
  local d = tonumber(string.sub(s, 9, 10))
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

-- docs/domain.md: visible on day D when start <= D, D <= end + window (if ended) and D < delete (if set).
local function is_visible(rec, today, window, ucpp_window)
  local s = days(rec.s)
  if s == nil or today < s then return false end
  local e = days(rec.e)
  if e ~= nil then
    local w = window
    if rec.p == 'UCPP' then w = ucpp_window end
    if today > e + w then return false end
  end
  local d = days(rec.d)
  if d ~= nil and today >= d then return false end
  return true
end
