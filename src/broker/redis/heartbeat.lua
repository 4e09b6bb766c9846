-- A node's record in the registry, stamped with the server's clock. KEYS[1]: the registry
-- hash. ARGV: node id, record (JSON without the heartbeat).
local now = clock()
local rec = cjson.decode(ARGV[2])
rec.last_heartbeat = now
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(rec))
return fmt(now)
