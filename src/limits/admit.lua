-- Atomic check-and-reserve for one request of one tenant. Nothing is written unless
-- every check passes, so concurrent admissions from any number of nodes can never
-- together exceed a limit.
--
-- KEYS: 1 rps counter of this second, 2 tpm hash (second -> tokens), 3 month hash,
--       4 hour hash, 5 lease zset (ticket -> deadline ms), 6 tickets hash
--       (ticket -> "COST MONTH HOUR", plus the sums rm:MONTH and rh:HOUR).
-- ARGV: 1 now ms, 2 now second, 3 ticket id, 4 rps, 5 concurrency, 6 tpm,
--       7 monthly budget, 8 hourly budget (each -1 when not set), 9 demand tokens,
--       10 demand cost, 11 month label, 12 hour, 13 lease deadline ms, 14 lease keys
--       ttl ms, 15 month key ttl ms, 16 mode (reserve | request).
-- Returns {verdict, retry_after_s, remaining_requests, remaining_tokens} where the
-- verdict is ok, rps, concurrency, tpm, monthly or hourly, and -1 means no limit.

local K_RPS, K_TPM, K_MONTH, K_HOUR, K_LEASE, K_TIX =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local sec = tonumber(ARGV[2])
local id = ARGV[3]
local rps, conc, tpm = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local monthly, hourly = ARGV[7], ARGV[8]
local tokens, cost = tonumber(ARGV[9]), ARGV[10]
local month, hour = ARGV[11], ARGV[12]
local reserve = ARGV[16] == 'reserve'

-- Tickets whose lease ran out belong to a node that crashed or lost Redis for a
-- whole lease: give their reservation and concurrency slot back. The lease and
-- tickets keys share one TTL; should the lease key go first, the sums it covered go.
if redis.call('EXISTS', K_LEASE) == 0 then
  redis.call('DEL', K_TIX)
else
  local dead = redis.call('ZRANGEBYSCORE', K_LEASE, '-inf', ARGV[1], 'LIMIT', 0, 100)
  for _, t in ipairs(dead) do
    release(K_TIX, K_LEASE, t)
  end
end

local count = tonumber(redis.call('GET', K_RPS) or '0')
local used, oldest = 0, nil
if tpm >= 0 then
  local flat = redis.call('HGETALL', K_TPM)
  for i = 1, #flat, 2 do
    local s, v = tonumber(flat[i]), tonumber(flat[i + 1])
    if sec - s >= 60 then
      redis.call('HDEL', K_TPM, flat[i])
    elseif v > 0 then
      used = used + v
      if not oldest or s < oldest then
        oldest = s
      end
    end
  end
end

local function remaining(extra_requests, extra_tokens)
  local rr, rt = -1, -1
  if rps >= 0 then
    rr = math.max(0, rps - count - extra_requests)
  end
  if tpm >= 0 then
    rt = math.max(0, tpm - used - extra_tokens)
  end
  return rr, rt
end

local function refuse(which, retry)
  local rr, rt = remaining(0, 0)
  return {which, retry, rr, rt}
end

if rps >= 0 and count >= rps then
  return refuse('rps', 1)
end
if reserve then
  if conc >= 0 and redis.call('ZCARD', K_LEASE) >= conc then
    return refuse('concurrency', 1)
  end
  if tpm >= 0 and used + tokens > tpm then
    return refuse('tpm', math.max(1, (oldest or sec) + 60 - sec))
  end
  local demand = money(cost)
  if monthly ~= '-1' then
    local held = money_add(money(redis.call('HGET', K_MONTH, 'spent')),
      money(redis.call('HGET', K_TIX, 'rm:' .. month)))
    if money_gt(money_add(held, demand), money(monthly)) then
      return refuse('monthly', 0)
    end
  end
  if hourly ~= '-1' then
    local held = money_add(money(redis.call('HGET', K_HOUR, 'spent')),
      money(redis.call('HGET', K_TIX, 'rh:' .. hour)))
    if money_gt(money_add(held, demand), money(hourly)) then
      return refuse('hourly', 0)
    end
  end
end

redis.call('INCR', K_RPS)
redis.call('PEXPIRE', K_RPS, 2000)
redis.call('HINCRBY', K_MONTH, 'requests', 1)
redis.call('PEXPIRE', K_MONTH, ARGV[15])
if reserve then
  if tokens > 0 then
    redis.call('HINCRBY', K_TPM, ARGV[2], ARGV[9])
    redis.call('PEXPIRE', K_TPM, 120000)
  end
  redis.call('ZADD', K_LEASE, ARGV[13], id)
  redis.call('HSET', K_TIX, id, cost .. ' ' .. month .. ' ' .. hour)
  if cost ~= '0' then
    redis.call('HINCRBY', K_TIX, 'rm:' .. month, cost)
    redis.call('HINCRBY', K_TIX, 'rh:' .. hour, cost)
  end
  redis.call('PEXPIRE', K_LEASE, ARGV[14])
  redis.call('PEXPIRE', K_TIX, ARGV[14])
end
local rr, rt = remaining(1, reserve and tokens or 0)
return {'ok', 0, rr, rt}
