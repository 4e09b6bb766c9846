-- A held task's process exists: it becomes running (its attempt counted once), pid kept.
-- ARGV: id, token, node, pid, pid_start, boot. Returns 'ok', 'lost' or 'missing'.
local p = KEYS[1]
local id, token, node = ARGV[1], ARGV[2], ARGV[3]
local t = p .. 't:' .. id
local f = redis.call('HMGET', t, 'state', 'token', 'node', 'seq')
if not f[1] then return 'missing' end
if f[2] ~= token or f[3] ~= node or (f[1] ~= 'queued' and f[1] ~= 'running') then
  return 'lost'
end
local now = fmt(clock())
if f[1] == 'queued' then
  redis.call('HINCRBY', t, 'attempts', 1)
  redis.call('HSET', t, 'state', 'running', 'started_at', now)
  move_state(p, id, 'queued', 'running', f[4])
end
redis.call('HSET', t, 'updated_at', now, 'pid', ARGV[4], 'pid_start', ARGV[5], 'pid_boot', ARGV[6])
return 'ok'
