-- Store up to ARGV[1] entries of the queue's inbox (see inbox.lua). With ARGV[2], an id:
-- also whether that task is stored now. Returns { entries taken, entries left, stored }.
local p = KEYS[1]
local took = store_inbox(p, tonumber(ARGV[1]))
local stored = 0
if ARGV[2] then stored = redis.call('EXISTS', p .. 't:' .. ARGV[2]) end
return { took, redis.call('LLEN', p .. 'in'), stored }
