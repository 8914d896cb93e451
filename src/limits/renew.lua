-- Extends the leases of tickets still in flight on this node, in every scope they
-- hold (a tenant and maybe one of its keys), so a long request keeps its
-- reservation and slot while a crashed node's expire. A ticket already reclaimed (its
-- node lost Redis for a whole lease) is not brought back.
--
-- KEYS: 2 per scope: lease zset, tickets hash.
-- ARGV: 1 new deadline ms, 2 lease keys ttl ms, 3.. ticket ids.

for k = 1, #KEYS - 1, 2 do
  for i = 3, #ARGV do
    redis.call('ZADD', KEYS[k], 'XX', ARGV[1], ARGV[i])
  end
  if redis.call('EXISTS', KEYS[k]) == 1 then
    redis.call('PEXPIRE', KEYS[k], ARGV[2])
    redis.call('PEXPIRE', KEYS[k + 1], ARGV[2])
  end
end
return 0
