-- Takes one request and TOKENS from a deployment's quota for the current minute, if
-- it has room; Redis runs scripts one at a time, so nodes together never send more
-- than RPM requests in a minute. Also reports the shared cooldown, so a node asking
-- first learns of one another node saw.
--
-- KEYS: 1 requests this minute, 2 tokens this minute, 3 cooldown until (ms).
-- ARGV: 1 rpm (-1: none), 2 tpm (-1: none), 3 tokens, 4 ttl ms, 5 now ms.
-- Returns {taken 0|1, requests, tokens, cooldown until ms (0: none)}.

local r = tonumber(redis.call('GET', KEYS[1]) or '0')
local t = tonumber(redis.call('GET', KEYS[2]) or '0')
local cd = tonumber(redis.call('GET', KEYS[3]) or '0')
local rpm, tpm, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if cd > tonumber(ARGV[5]) then
  return {0, r, t, cd}
end
if rpm >= 0 and r >= rpm then
  return {0, r, t, 0}
end
-- A request alone above the tpm still goes when the minute is empty: the provider
-- decides about it, and it must not be refused by every deployment forever.
if tpm >= 0 and t > 0 and t + n > tpm then
  return {0, r, t, 0}
end
r = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
t = redis.call('INCRBY', KEYS[2], n)
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return {1, r, t, 0}
