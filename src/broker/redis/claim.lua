-- Promote due waiting tasks, then reserve up to `max` ready tasks for a node.
-- ARGV: node, max, lease (ms), then flow control (broker rule 15): per_key (0: none),
-- the rate's interval and tolerance (µs; interval 0: no rate), keyed rate (0/1).
-- Returns one HGETALL array per claimed task; with flow control, then {'wait', ms or ''}.
local p = KEYS[1]
local node, max, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local per_key, interval, tolerance = tonumber(ARGV[4] or '0'), tonumber(ARGV[5] or '0'), tonumber(ARGV[6] or '0')
local keyed = ARGV[7] == '1'
local report = per_key > 0 or interval > 0
-- Tasks parked under limits since removed (a reload) are put back by the same walk.
local flow = report or redis.call('EXISTS', p .. 'pkeys') == 1
if redis.call('EXISTS', p .. 'paused') == 1 then return {} end
local now, now_us = clock()
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
-- Flow control (broker rule 15; docs/architecture.md, "Flow control"). A task's `fkey`
-- (concurrency key) counts while it is held: `kh:<key>` holds the ids a claim gave the key,
-- and is trimmed of those no longer in `held` when read. A task of a full key, or of a rate
-- key that must wait, is parked: moved from `ready` to `pk:<kind>:<key>` (same score and
-- member), its key listed in `pkeys` (field `<kind>:<key>`, value: till, ms). Each claim
-- first puts back what may run now, then walks `ready`, taking or parking each task read.
-- Returns the members to claim (already removed from `ready`) and the first ms a refused
-- rate allows a start.
local function holders(p, key)
  local set = p .. 'kh:' .. key
  local ids = redis.call('SMEMBERS', set)
  local n = 0
  for _, id in ipairs(ids) do
    if redis.call('ZSCORE', p .. 'held', id) then
      n = n + 1
    else
      redis.call('SREM', set, id)
    end
  end
  return n
end

local function flow_pick(p, max, now, now_us, per_key, interval, tolerance, keyed)
  local pkeys = redis.call('HGETALL', p .. 'pkeys')
  for i = 1, #pkeys, 2 do
    local field, till = pkeys[i], tonumber(pkeys[i + 1])
    local kind, key = string.sub(field, 1, 1), string.sub(field, 3)
    local free
    if kind == 'c' then
      if per_key > 0 then free = per_key - holders(p, key) else free = 1e9 end
    elseif interval > 0 and till > now then
      free = 0
    elseif interval > 0 then
      free = math.floor(tolerance / interval) + 1
    else
      free = 1e9
    end
    local pk = p .. 'pk:' .. field
    local moved = 0
    while moved < free do
      local batch = redis.call('ZRANGE', pk, 0, math.min(free - moved, 1000) - 1, 'WITHSCORES')
      if #batch == 0 then break end
      for j = 1, #batch, 2 do
        local m = batch[j]
        redis.call('ZREM', pk, m)
        local f = redis.call('HMGET', p .. 't:' .. string.sub(m, 19), 'state', 'node')
        if f[1] == 'queued' and (not f[2] or f[2] == '') then
          redis.call('ZADD', p .. 'ready', batch[j + 1], m)
          moved = moved + 1
        end
      end
    end
    if redis.call('EXISTS', pk) == 0 then redis.call('HDEL', p .. 'pkeys', field) end
  end
  local picked = {}
  local count = {}
  local tats = {}
  local stop = nil
  local function park(m, score, field, till)
    redis.call('ZREM', p .. 'ready', m)
    redis.call('ZADD', p .. 'pk:' .. field, score, m)
    redis.call('HSET', p .. 'pkeys', field, fmt(till))
  end
  while #picked < max and not stop do
    local batch = redis.call('ZRANGE', p .. 'ready', 0, max - #picked + 15, 'WITHSCORES')
    if #batch == 0 then break end
    for j = 1, #batch, 2 do
      if #picked >= max then break end
      local m, score = batch[j], batch[j + 1]
      local id = string.sub(m, 19)
      local f = redis.call('HMGET', p .. 't:' .. id, 'fkey', 'rkey')
      local fk, rk = f[1], f[2]
      local ok = true
      if per_key > 0 and fk then
        if not count[fk] then count[fk] = holders(p, fk) end
        if count[fk] >= per_key then
          park(m, score, 'c:' .. fk, 0)
          ok = false
        end
      end
      if ok and interval > 0 then
        local key = ''
        if keyed then key = rk or '' end
        local tat = tats[key]
        if tat == nil then tat = tonumber(redis.call('HGET', p .. 'rate', key) or '0') end
        if tat < now_us then tat = now_us end
        if tat - tolerance <= now_us then
          tats[key] = tat + interval
          redis.call('HSET', p .. 'rate', key, fmt(tat + interval))
        else
          local at = math.ceil((tat - tolerance) / 1000)
          ok = false
          if keyed then
            park(m, score, 'r:' .. key, at)
          else
            stop = at
            break
          end
        end
      end
      if ok then
        redis.call('ZREM', p .. 'ready', m)
        picked[#picked + 1] = m
        if fk then
          count[fk] = (count[fk] or 0) + 1
          redis.call('SADD', p .. 'kh:' .. fk, id)
        end
      end
    end
  end
  local wait = stop
  if keyed and interval > 0 then
    local all = redis.call('HGETALL', p .. 'pkeys')
    for i = 1, #all, 2 do
      if string.sub(all[i], 1, 1) == 'r' then
        local u = tonumber(all[i + 1])
        if not wait or u < wait then wait = u end
      end
    end
  end
  return picked, wait
end

local out = {}
if max <= 0 then return out end
-- Store as many inbox tasks as this claim could take, so that it chooses among them too
-- (by priority, then age). Each push adds an entry for its time: 2 * max entries hold at
-- least max tasks.
store_inbox(p, 2 * max)
local expires = fmt(now + lease)
local wait = nil
local held = {}
local fresh = { token = true, node = true, expires = true, updated_at = true }
local stale_pid = { pid = true, pid_start = true, pid_boot = true }
-- A task read past its expiry is set aside, not claimed (broker rule 16): the claim then
-- reads on, so that expired tasks at the head never keep it from the ready ones behind.
local wanted = max
while wanted > 0 do
  local members
  if flow then
    members, wait = flow_pick(p, wanted, now, now_us, per_key, interval, tolerance, keyed)
  else
    members = redis.call('ZRANGE', p .. 'ready', 0, wanted - 1)
  end
  if #members == 0 then break end
  -- Few calls per task: every call a script makes costs the server far more than the Lua
  -- around it. The task is read once, and the reply is that row with the claim applied.
  for i = 1, #members, 1000 do
    redis.call('ZREM', p .. 'ready', unpack(members, i, math.min(i + 999, #members)))
  end
  local set_aside = 0
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
      set_aside = set_aside + 1
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
  if set_aside == 0 then break end
  wanted = max - #out
end
for i = 1, #held, 2000 do
  redis.call('ZADD', p .. 'held', unpack(held, i, math.min(i + 1999, #held)))
end
if report then out[#out + 1] = { 'wait', wait and fmt(wait) or '' } end
return out
