-- Enqueue a batch, all or nothing. ARGV: n, then 8 fields per task:
-- id, payload, args (JSON), priority, unique key ('' = none, else 'k:' .. key), run_at ('' = now),
-- concurrency key and rate key (each '' = none, else 'k:' .. key).
-- Returns, per task: id, state, existing (0/1), created_at, run_at.
local p = KEYS[1]
local queue = string.match(p, '{q:(.*)}')
local n = tonumber(ARGV[1])
local now, now_us = clock()
local seen = {}
for i = 0, n - 1 do
  local id = ARGV[2 + i * 8]
  if seen[id] or redis.call('EXISTS', p .. 't:' .. id) == 1 then
    return redis.error_reply('DUPLICATE a task with id ' .. id .. ' already exists')
  end
  seen[id] = true
end
local last = tonumber(redis.call('GET', p .. 'seq') or '0')
local out = {}
-- Index entries are gathered and written with one ZADD per index (in chunks: unpack has
-- a limit), rather than one call per task.
local adds = {}
local function add(key, score, member)
  local a = adds[key]
  if not a then
    a = {}
    adds[key] = a
  end
  a[#a + 1] = score
  a[#a + 1] = member
end
local work, sched = false, false
for i = 0, n - 1 do
  local b = 2 + i * 8
  local id, payload, args, priority, uk, run_at, fk, rkey =
    ARGV[b], ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4], ARGV[b + 5], ARGV[b + 6], ARGV[b + 7]
  local key = nil
  local holder = false
  if uk ~= '' then
    key = string.sub(uk, 3)
    holder = redis.call('HGET', p .. 'u', key)
  end
  if holder then
    local f = redis.call('HMGET', p .. 't:' .. holder, 'state', 'created_at', 'run_at')
    for _, v in ipairs({ holder, f[1], '1', f[2], f[3] }) do out[#out + 1] = v end
  else
    local ra = now
    if run_at ~= '' then ra = tonumber(run_at) end
    local state = 'queued'
    if ra > now then state = 'scheduled' end
    local seq = now_us
    if seq <= last then seq = last + 1 end
    last = seq
    local sseq = fmt(seq)
    local rk = string.format('%017.0f', seq) .. ':' .. id
    local t = p .. 't:' .. id
    redis.call('HSET', t, 'id', id, 'queue', queue, 'state', state, 'payload', payload,
      'args', args, 'priority', priority, 'run_at', fmt(ra), 'attempts', '0',
      'created_at', fmt(now), 'updated_at', fmt(now), 'cancel_requested', '0', 'token', '0',
      'seq', sseq, 'rk', rk)
    if fk ~= '' then redis.call('HSET', t, 'fkey', string.sub(fk, 3)) end
    if rkey ~= '' then redis.call('HSET', t, 'rkey', string.sub(rkey, 3)) end
    if key then
      redis.call('HSET', t, 'unique_key', key)
      redis.call('HSET', p .. 'u', key, id)
    end
    add(p .. 'st:' .. state, sseq, id)
    add(p .. 'all', sseq, id)
    if state == 'queued' then
      add(p .. 'ready', fmt(-tonumber(priority)), rk)
      work = true
    else
      add(p .. 'waiting', fmt(ra), id)
      sched = true
    end
    for _, v in ipairs({ id, state, '0', fmt(now), fmt(ra) }) do out[#out + 1] = v end
  end
end
for key, a in pairs(adds) do
  for i = 1, #a, 2000 do
    redis.call('ZADD', key, unpack(a, i, math.min(i + 1999, #a)))
  end
end
redis.call('SET', p .. 'seq', fmt(last))
if work then redis.call('PUBLISH', 'taskd:wake', 'work') end
if sched then redis.call('PUBLISH', 'taskd:wake', 'sched') end
return out
