-- Helpers shared by the limits scripts (prepended to each one by redis.rs).
--
-- Money is integer nano-USD. Lua numbers are doubles, exact only below 2^53
-- (about 9 million USD), so amounts are compared as two base-1e9 limbs parsed from
-- their decimal strings; Redis itself stores and adds them as exact 64-bit integers
-- (HINCRBY), never through a Lua number.

local LIMB = 1000000000

-- A non-negative decimal string (or nil/false) as {high, low} limbs.
local function money(s)
  if not s or s == '' or string.sub(s, 1, 1) == '-' then
    return {0, 0}
  end
  local n = #s
  if n <= 9 then
    return {0, tonumber(s)}
  end
  return {tonumber(string.sub(s, 1, n - 9)), tonumber(string.sub(s, n - 8))}
end

local function money_add(a, b)
  local hi, lo = a[1] + b[1], a[2] + b[2]
  if lo >= LIMB then
    hi, lo = hi + 1, lo - LIMB
  end
  return {hi, lo}
end

local function money_gt(a, b)
  return a[1] > b[1] or (a[1] == b[1] and a[2] > b[2])
end

-- Takes a ticket's reserved cost back out of a reservation sum in the tickets hash,
-- dropping the field once it is empty.
local function unreserve(tix, field, cost)
  if cost ~= '0' then
    if redis.call('HINCRBY', tix, field, '-' .. cost) <= 0 then
      redis.call('HDEL', tix, field)
    end
  end
end

-- Releases one ticket's reservation if it is still held; true if it was.
-- A ticket record is "COST MONTH HOUR".
local function release(tix, lease, id)
  local rec = redis.call('HGET', tix, id)
  redis.call('ZREM', lease, id)
  if not rec then
    return false
  end
  local cost, month, hour = string.match(rec, '^(%d+) (%S+) (%d+)$')
  if cost then
    unreserve(tix, 'rm:' .. month, cost)
    unreserve(tix, 'rh:' .. hour, cost)
  end
  redis.call('HDEL', tix, id)
  return true
end
