-- Extends the leases of tickets still in flight on this node, so a long request
-- keeps its reservation and slot while a crashed node's expire. A ticket already
-- reclaimed (its node lost Redis for a whole lease) is not brought back.
--
-- KEYS: 1 lease zset, 2 tickets hash.
-- ARGV: 1 new deadline ms, 2 lease keys ttl ms, 3.. ticket ids.

for i = 3, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', ARGV[1], ARGV[i])
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
return 0
