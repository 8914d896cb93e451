-- Settles (or, with zero actuals, releases) one ticket in each of its scopes (its
-- tenant and, for a key with limits of its own, the key), in one script so that no
-- scope is ever settled without the other: in each, gives back its reservation and
-- concurrency slot if that scope still holds them, trades its reserved tokens in the
-- tokens window for the actual ones, and records the actual spend, tokens and (for
-- requests not counted at admission) the request, in the month and hour the ticket
-- was admitted in. Safe to run for a ticket Redis never saw or already reclaimed:
-- then only the spend is recorded.
--
-- KEYS: 5 per scope, scope i (from 0) at 5i+1..5i+5: tpm hash, month hash, hour
--       hash, lease zset, tickets hash.
-- ARGV: 1 now second, 2 ticket id, 3 admission second, 4 reserved tokens,
--       5 tokens in, 6 tokens out, 7 cost, 8 month key ttl ms, 9 hour key ttl ms,
--       10 count the request (1 | 0), 11 replay of a settle that may have run (1 | 0).
-- Returns how many scopes still held the ticket.

local now_s, admitted = tonumber(ARGV[1]), tonumber(ARGV[3])
local actual = tonumber(ARGV[5]) + tonumber(ARGV[6])
local cost = ARGV[7]

local function settle(K_TPM, K_MONTH, K_HOUR, K_LEASE, K_TIX)
  local held = release(K_TIX, K_LEASE, ARGV[2])
  -- A replay after a lost reply: a ticket no longer held was settled by the first
  -- run (each scope is released by the same run, so they agree).
  if ARGV[11] == '1' and not held then
    return 0
  end
  -- Only a ticket still held has its reserved tokens in the window: one Redis never
  -- saw (an admission whose reply was lost before the script ran) or already
  -- reclaimed must not take other requests' tokens out.
  local reserved = 0
  if held then
    reserved = tonumber(ARGV[4])
  end

  if now_s - admitted < 60 and (reserved > 0 or actual > 0) then
    local cur = tonumber(redis.call('HGET', K_TPM, ARGV[3]) or '0')
    local v = math.max(0, cur - reserved + actual)
    if v > 0 then
      redis.call('HSET', K_TPM, ARGV[3], string.format('%d', v))
      redis.call('PEXPIRE', K_TPM, 120000)
    else
      redis.call('HDEL', K_TPM, ARGV[3])
    end
  end

  if cost ~= '0' then
    redis.call('HINCRBY', K_MONTH, 'spent', cost)
    redis.call('HINCRBY', K_HOUR, 'spent', cost)
    redis.call('PEXPIRE', K_HOUR, ARGV[9])
  end
  if ARGV[5] ~= '0' then
    redis.call('HINCRBY', K_MONTH, 'tokens_in', ARGV[5])
  end
  if ARGV[6] ~= '0' then
    redis.call('HINCRBY', K_MONTH, 'tokens_out', ARGV[6])
  end
  if ARGV[10] == '1' then
    redis.call('HINCRBY', K_MONTH, 'requests', 1)
  end
  if redis.call('EXISTS', K_MONTH) == 1 then
    redis.call('PEXPIRE', K_MONTH, ARGV[8])
  end
  return held and 1 or 0
end

local held = 0
for k = 0, #KEYS - 5, 5 do
  held = held + settle(KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], KEYS[k + 5])
end
return held
