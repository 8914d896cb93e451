-- Atomic check-and-reserve for one request in each of its scopes (its tenant and,
-- for a key with limits of its own, the key). Every scope is checked before any is
-- written, and nothing is written unless every check of every scope passes, so
-- concurrent admissions from any number of nodes can never together exceed a limit
-- of any scope.
--
-- KEYS: 6 per scope, scope i (from 0) at 6i+1..6i+6: rps counter of this second,
--       tpm hash (second -> tokens), month hash, hour hash, lease zset (ticket ->
--       deadline ms), tickets hash (ticket -> "COST MONTH HOUR", plus the sums
--       rm:MONTH and rh:HOUR).
-- ARGV: 1 now ms, 2 now second, 3 ticket id, 4 demand tokens, 5 demand cost,
--       6 month label, 7 hour, 8 lease deadline ms, 9 lease keys ttl ms, 10 month key
--       ttl ms, 11 mode (reserve | request); then 5 per scope, scope i at 12+5i..16+5i:
--       rps, concurrency, tpm, monthly budget, hourly budget (each -1 when not set).
-- Returns {verdict, scope, retry_after_s, {remaining_requests...}, {remaining_tokens...}}
-- where the verdict is ok, rps, concurrency, tpm, monthly or hourly, scope is the
-- 1-based index of the refusing scope (0 for ok), the remainings have one entry per
-- scope, and -1 means no limit.

local n = #KEYS / 6
local sec = tonumber(ARGV[2])
local id = ARGV[3]
local tokens, cost = tonumber(ARGV[4]), ARGV[5]
local month, hour = ARGV[6], ARGV[7]
local reserve = ARGV[11] == 'reserve'

local scopes = {}
for i = 1, n do
  local k, a = 6 * (i - 1), 12 + 5 * (i - 1)
  scopes[i] = {
    rps_key = KEYS[k + 1], tpm_key = KEYS[k + 2], month_key = KEYS[k + 3],
    hour_key = KEYS[k + 4], lease = KEYS[k + 5], tix = KEYS[k + 6],
    rps = tonumber(ARGV[a]), conc = tonumber(ARGV[a + 1]), tpm = tonumber(ARGV[a + 2]),
    monthly = ARGV[a + 3], hourly = ARGV[a + 4],
  }
end

-- Tickets whose lease ran out belong to a node that crashed or lost Redis for a
-- whole lease: give their reservation and concurrency slot back. The lease and
-- tickets keys share one TTL; should the lease key go first, the sums it covered go.
for _, s in ipairs(scopes) do
  if redis.call('EXISTS', s.lease) == 0 then
    redis.call('DEL', s.tix)
  else
    local dead = redis.call('ZRANGEBYSCORE', s.lease, '-inf', ARGV[1], 'LIMIT', 0, 100)
    for _, t in ipairs(dead) do
      release(s.tix, s.lease, t)
    end
  end
end

for _, s in ipairs(scopes) do
  s.count = tonumber(redis.call('GET', s.rps_key) or '0')
  s.used = 0
  if s.tpm >= 0 then
    local flat = redis.call('HGETALL', s.tpm_key)
    for i = 1, #flat, 2 do
      local t, v = tonumber(flat[i]), tonumber(flat[i + 1])
      if sec - t >= 60 then
        redis.call('HDEL', s.tpm_key, flat[i])
      elseif v > 0 then
        s.used = s.used + v
        if not s.oldest or t < s.oldest then
          s.oldest = t
        end
      end
    end
  end
end

local function remaining(extra_requests, extra_tokens)
  local rr, rt = {}, {}
  for i, s in ipairs(scopes) do
    rr[i], rt[i] = -1, -1
    if s.rps >= 0 then
      rr[i] = math.max(0, s.rps - s.count - extra_requests)
    end
    if s.tpm >= 0 then
      rt[i] = math.max(0, s.tpm - s.used - extra_tokens)
    end
  end
  return rr, rt
end

local function refuse(which, scope, retry)
  local rr, rt = remaining(0, 0)
  return {which, scope, retry, rr, rt}
end

local demand = money(cost)
for i, s in ipairs(scopes) do
  if s.rps >= 0 and s.count >= s.rps then
    return refuse('rps', i, 1)
  end
  if reserve then
    if s.conc >= 0 and redis.call('ZCARD', s.lease) >= s.conc then
      return refuse('concurrency', i, 1)
    end
    if s.tpm >= 0 and s.used + tokens > s.tpm then
      return refuse('tpm', i, math.max(1, (s.oldest or sec) + 60 - sec))
    end
    if s.monthly ~= '-1' then
      local held = money_add(money(redis.call('HGET', s.month_key, 'spent')),
        money(redis.call('HGET', s.tix, 'rm:' .. month)))
      if money_gt(money_add(held, demand), money(s.monthly)) then
        return refuse('monthly', i, 0)
      end
    end
    if s.hourly ~= '-1' then
      local held = money_add(money(redis.call('HGET', s.hour_key, 'spent')),
        money(redis.call('HGET', s.tix, 'rh:' .. hour)))
      if money_gt(money_add(held, demand), money(s.hourly)) then
        return refuse('hourly', i, 0)
      end
    end
  end
end

for _, s in ipairs(scopes) do
  redis.call('INCR', s.rps_key)
  redis.call('PEXPIRE', s.rps_key, 2000)
  redis.call('HINCRBY', s.month_key, 'requests', 1)
  redis.call('PEXPIRE', s.month_key, ARGV[10])
  if reserve then
    if tokens > 0 then
      redis.call('HINCRBY', s.tpm_key, ARGV[2], ARGV[4])
      redis.call('PEXPIRE', s.tpm_key, 120000)
    end
    redis.call('ZADD', s.lease, ARGV[8], id)
    redis.call('HSET', s.tix, id, cost .. ' ' .. month .. ' ' .. hour)
    if cost ~= '0' then
      redis.call('HINCRBY', s.tix, 'rm:' .. month, cost)
      redis.call('HINCRBY', s.tix, 'rh:' .. hour, cost)
    end
    redis.call('PEXPIRE', s.lease, ARGV[9])
    redis.call('PEXPIRE', s.tix, ARGV[9])
  end
end
local rr, rt = remaining(1, reserve and tokens or 0)
return {'ok', 0, 0, rr, rt}
