-- Promote due waiting tasks, then reserve up to `max` ready tasks for a node.
-- ARGV: node, max, lease (ms). Returns one HGETALL array per claimed task.
local p = KEYS[1]
local node, max, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if redis.call('EXISTS', p .. 'paused') == 1 then return {} end
local now = clock()
local due = redis.call('ZRANGEBYSCORE', p .. 'waiting', '-inf', fmt(now), 'LIMIT', 0, 1000)
for _, id in ipairs(due) do
  local t = p .. 't:' .. id
  local f = redis.call('HMGET', t, 'state', 'seq', 'priority', 'rk', 'expires_at')
  redis.call('ZREM', p .. 'waiting', id)
  -- Past its expiry it is not promoted: `expire` cancels it (it is still in `exp`).
  if (f[1] == 'scheduled' or f[1] == 'retrying') and not (f[5] and tonumber(f[5]) <= now) then
    move_state(p, id, f[1], 'queued', f[2])
    redis.call('HSET', t, 'state', 'queued', 'updated_at', fmt(now))
    ready_add(p, f[3], f[4])
  end
end
local out = {}
if max <= 0 then return out end
-- Store as many inbox tasks as this claim could take, so that it chooses among them too
-- (by priority, then age). Each push adds an entry for its time: 2 * max entries hold at
-- least max tasks.
store_inbox(p, 2 * max)
local expires = fmt(now + lease)
local members = redis.call('ZRANGE', p .. 'ready', 0, max - 1)
if #members == 0 then return out end
-- Few calls per task: every call a script makes costs the server far more than the Lua
-- around it. The task is read once, and the reply is that row with the claim applied.
for i = 1, #members, 1000 do
  redis.call('ZREM', p .. 'ready', unpack(members, i, math.min(i + 999, #members)))
end
local held = {}
local fresh = { token = true, node = true, expires = true, updated_at = true }
local stale_pid = { pid = true, pid_start = true, pid_boot = true }
for _, m in ipairs(members) do
  local id = string.sub(m, 19)
  local t = p .. 't:' .. id
  local row = redis.call('HGETALL', t)
  local reply, token, had_pid, expired = {}, 1, false, false
  for i = 1, #row, 2 do
    local k = row[i]
    if k == 'expires_at' and tonumber(row[i + 1]) <= now then
      expired = row[i + 1]
    end
    if k == 'token' then
      token = tonumber(row[i + 1]) + 1
    elseif stale_pid[k] then
      had_pid = true
    elseif not fresh[k] then
      reply[#reply + 1] = k
      reply[#reply + 1] = row[i + 1]
    end
  end
  if expired then
    -- Never started past its expiry: left (out of `ready`) for `expire` to cancel.
    redis.call('ZADD', p .. 'exp', expired, id)
  else
    local claim = { 'token', fmt(token), 'node', node, 'expires', expires, 'updated_at', fmt(now) }
    redis.call('HSET', t, unpack(claim))
    if had_pid then redis.call('HDEL', t, 'pid', 'pid_start', 'pid_boot') end
    for _, v in ipairs(claim) do reply[#reply + 1] = v end
    held[#held + 1] = expires
    held[#held + 1] = id
    out[#out + 1] = reply
  end
end
for i = 1, #held, 2000 do
  redis.call('ZADD', p .. 'held', unpack(held, i, math.min(i + 1999, #held)))
end
return out
