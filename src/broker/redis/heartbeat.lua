-- A node's record in the registry, stamped with the server's clock. KEYS[1]: the registry
-- hash. ARGV: node id, record (a JSON object without `last_heartbeat`, appended here).
local now = clock()
local rec = string.gsub(ARGV[2], '}%s*$', '')
if rec ~= '{' then rec = rec .. ',' end
redis.call('HSET', KEYS[1], ARGV[1], rec .. '"last_heartbeat":' .. fmt(now) .. '}')
return fmt(now)
