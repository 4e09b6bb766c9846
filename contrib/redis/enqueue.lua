-- taskd's enqueue script, as the daemon and `taskd submit` run it (src/broker/redis/lib.lua
-- followed by src/broker/redis/enqueue.lua). See docs/redis.md for how to call it.

-- Helpers shared by every taskd script (prepended to each one).
-- KEYS[1] is always the queue's prefix, `taskd:{q:<queue>}:`; every key a script touches
-- starts with it, so on Redis Cluster one script stays in one hash slot.
-- Numbers are passed to Redis through fmt(): Lua would print a large one in exponent form.

local function fmt(n)
  return string.format('%.0f', n)
end

local function clock()
  local t = redis.call('TIME')
  local s, us = tonumber(t[1]), tonumber(t[2])
  return s * 1000 + math.floor(us / 1000), s * 1000000 + us
end

-- The prefix of another queue's keys. Dependencies are the one link between queues: a
-- parent's dependants may be on other queues (docs/redis.md, "Dependencies").
local function qprefix(queue)
  return 'taskd:{q:' .. queue .. '}:'
end

local FINISHED = { succeeded = true, failed = true, cancelled = true }

-- Move a task between the per-state indexes (`st:<state>`, scored by seq). A finished
-- task is also in `fin:<state>`, scored by its finish time `at` (ms, the `finished_at` the
-- script writes), which retention reads with ZRANGEBYSCORE (prune.lua).
local function move_state(p, id, from, to, seq, at)
  if from then
    redis.call('ZREM', p .. 'st:' .. from, id)
    if FINISHED[from] then redis.call('ZREM', p .. 'fin:' .. from, id) end
  end
  redis.call('ZADD', p .. 'st:' .. to, seq, id)
  if FINISHED[to] then
    -- Scored by when retention may count from: the finish, or, for a task whose unique
    -- key holds past it (`unique_for`), the end of that hold. A parent with dependants
    -- not finished (`pin`) is left out until the last of them finishes.
    local f = redis.call('HMGET', p .. 't:' .. id, 'unique_for')
    if redis.call('HEXISTS', p .. 'pin', id) == 0 then
      local score = tonumber(at or fmt((clock()))) + tonumber(f[1] or '0')
      redis.call('ZADD', p .. 'fin:' .. to, fmt(score), id)
    end
    -- A dependant that finished no longer keeps its parents from retention (broker rule
    -- 18): `pin` counts each parent's dependants not finished yet; a parent whose count
    -- drops to zero is put back in its `fin:<state>` (prune.lua took it out).
    local aq = redis.call('HGET', p .. 't:' .. id, 'afterq')
    if aq then
      redis.call('HDEL', p .. 't:' .. id, 'afterq')
      for pq, pid in string.gmatch(aq, '([^,]-)\31([^,]+)') do
        local pp = qprefix(pq)
        if redis.call('HINCRBY', pp .. 'pin', pid, -1) <= 0 then
          redis.call('HDEL', pp .. 'pin', pid)
          local f = redis.call('HMGET', pp .. 't:' .. pid, 'state', 'finished_at', 'unique_for')
          if f[1] and FINISHED[f[1]] and f[2] then
            redis.call('ZADD', pp .. 'fin:' .. f[1], fmt(tonumber(f[2]) + tonumber(f[3] or '0')), pid)
          end
        end
      end
    end
  end
end

-- A finished task no longer holds its unique key, unless it was given `unique_for`: then
-- the key stays taken until that long after now (`uf`: key -> '<until ms>:<id>').
local function free_unique(p, id, key)
  if key and redis.call('HGET', p .. 'u', key) == id then
    redis.call('HDEL', p .. 'u', key)
    local hold = redis.call('HGET', p .. 't:' .. id, 'unique_for')
    if hold then
      redis.call('HSET', p .. 'uf', key, fmt(clock() + tonumber(hold)) .. ':' .. id)
    end
  end
end


-- Task `id` of prefix `p` ended in `state`: settle its dependants (broker rule 13), listed
-- in `kids:<id>` as '<queue>\31<id>'. A success counts each one's `blocked` down and puts
-- one with none left in its queue's `waiting` index (promoted by the next claim); a failure
-- or a cancel cancels them, and theirs after them.
local function settle(p, id, state)
  local kids = p .. 'kids:' .. id
  local members = redis.call('SMEMBERS', kids)
  if #members == 0 then return end
  redis.call('DEL', kids)
  local now = fmt(clock())
  local woke = false
  for _, m in ipairs(members) do
    local cq, cid = string.match(m, '^(.-)\31(.*)$')
    local cp = qprefix(cq)
    local ct = cp .. 't:' .. cid
    local f = redis.call('HMGET', ct, 'state', 'blocked', 'seq', 'run_at', 'unique_key')
    if f[1] == 'scheduled' and tonumber(f[2] or '0') > 0 then
      if state == 'succeeded' then
        if redis.call('HINCRBY', ct, 'blocked', -1) <= 0 then
          redis.call('HDEL', ct, 'blocked')
          redis.call('HSET', ct, 'updated_at', now)
          redis.call('ZADD', cp .. 'waiting', f[4], cid)
          woke = true
        end
      else
        redis.call('HSET', ct, 'state', 'cancelled', 'finished_at', now, 'updated_at', now,
          'last_error', 'dependency ' .. id .. ' failed')
        redis.call('HDEL', ct, 'blocked')
        move_state(cp, cid, 'scheduled', 'cancelled', f[3], now)
        free_unique(cp, cid, f[5])
        settle(cp, cid, 'cancelled')
      end
    end
  end
  if woke then redis.call('PUBLISH', 'taskd:wake', 'sched') end
end

local function ready_add(p, priority, rk)
  redis.call('ZADD', p .. 'ready', fmt(-tonumber(priority)), rk)
end
-- Enqueue a batch, all or nothing. ARGV: n, then 11 fields per task:
-- id, payload, args (JSON), priority, unique key ('' = none, else 'k:' .. key), run_at ('' = now),
-- unique_for (ms, '' = none), parents ('' = none, else '<queue>\31<id>' joined by ','),
-- concurrency key and rate key (each '' = none, else 'k:' .. key), expires_at (ms, '' = none).
-- Returns, per task: id, state, existing (0/1), created_at, run_at.
-- Callers written for the first 6 fields (docs/redis.md) may still pass only those: the rest
-- are then '' for every task.
local p = KEYS[1]
local queue = string.match(p, '{q:(.*)}')
local n = tonumber(ARGV[1])
local W = 11
if n > 0 and #ARGV == 1 + n * 6 then
  W = 6
end
local function field(b, k)
  if k >= W then
    return ''
  end
  return ARGV[b + k]
end
local now, now_us = clock()
local seen = {}
for i = 0, n - 1 do
  local id = ARGV[2 + i * W]
  if seen[id] or redis.call('EXISTS', p .. 't:' .. id) == 1 then
    return redis.error_reply('DUPLICATE a task with id ' .. id .. ' already exists')
  end
  -- Every parent exists (stored, or earlier in this batch).
  for pq, pid in string.gmatch(field(2 + i * W, 7), '([^,]-)\31([^,]+)') do
    if not seen[pid] and redis.call('EXISTS', qprefix(pq) .. 't:' .. pid) == 0 then
      return redis.error_reply('NOPARENT ' .. pid)
    end
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
  local b = 2 + i * W
  local id, payload, args, priority, uk, run_at, ufor, after =
    ARGV[b], ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4], ARGV[b + 5], field(b, 6), field(b, 7)
  local fk, rkey, expires = field(b, 8), field(b, 9), field(b, 10)
  local key = nil
  local holder = false
  if uk ~= '' then
    key = string.sub(uk, 3)
    holder = redis.call('HGET', p .. 'u', key)
    if not holder then
      -- A finished task whose `unique_for` has not run out still holds the key.
      local recent = redis.call('HGET', p .. 'uf', key)
      if recent then
        local untl, rid = string.match(recent, '^(%d+):(.*)$')
        if tonumber(untl) > now and redis.call('EXISTS', p .. 't:' .. rid) == 1 then
          holder = rid
        else
          redis.call('HDEL', p .. 'uf', key)
        end
      end
    end
  end
  if holder then
    local f = redis.call('HMGET', p .. 't:' .. holder, 'state', 'created_at', 'run_at')
    for _, v in ipairs({ holder, f[1], '1', f[2], f[3] }) do out[#out + 1] = v end
  else
    local ra = now
    if run_at ~= '' then ra = tonumber(run_at) end
    local state = 'queued'
    if ra > now then state = 'scheduled' end
    -- Parents (broker rule 13): one succeeded is done, one failed or cancelled cancels the
    -- task at once, each other one blocks it and lists it among its dependants.
    local ids, blocking, failed = {}, {}, nil
    for pq, pid in string.gmatch(after, '([^,]-)\31([^,]+)') do
      ids[#ids + 1] = pid
      local ps = redis.call('HGET', qprefix(pq) .. 't:' .. pid, 'state')
      if ps == 'failed' or ps == 'cancelled' then
        failed = failed or pid
      elseif ps ~= 'succeeded' then
        blocking[#blocking + 1] = { pq, pid }
      end
    end
    if failed then
      state = 'cancelled'
    elseif #blocking > 0 then
      state = 'scheduled'
    end
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
    if key and state ~= 'cancelled' then
      redis.call('HSET', p .. 'u', key, id)
    end
    if key then redis.call('HSET', t, 'unique_key', key) end
    if ufor ~= '' then redis.call('HSET', t, 'unique_for', ufor) end
    if fk ~= '' then redis.call('HSET', t, 'fkey', string.sub(fk, 3)) end
    if rkey ~= '' then redis.call('HSET', t, 'rkey', string.sub(rkey, 3)) end
    if #ids > 0 then redis.call('HSET', t, 'after', table.concat(ids, ',')) end
    if expires ~= '' and state ~= 'cancelled' then
      redis.call('HSET', t, 'expires_at', expires)
      add(p .. 'exp', expires, id)
    end
    if #ids > 0 and state ~= 'cancelled' then
      -- Its parents are kept from retention until it finishes (move_state unpins them).
      redis.call('HSET', t, 'afterq', after)
      for pq, pid in string.gmatch(after, '([^,]-)\31([^,]+)') do
        redis.call('HINCRBY', qprefix(pq) .. 'pin', pid, 1)
        redis.call('ZREM', qprefix(pq) .. 'fin:succeeded', pid)
      end
    end
    add(p .. 'st:' .. state, sseq, id)
    add(p .. 'all', sseq, id)
    if state == 'cancelled' then
      redis.call('HSET', t, 'finished_at', fmt(now), 'last_error', 'dependency ' .. failed .. ' failed')
    elseif #blocking > 0 then
      -- Out of `waiting` until its last parent succeeds: no claim reads it meanwhile.
      local seen_parent = {}
      local count = 0
      for _, pp in ipairs(blocking) do
        if not seen_parent[pp[2]] then
          seen_parent[pp[2]] = true
          count = count + 1
          redis.call('SADD', qprefix(pp[1]) .. 'kids:' .. pp[2], queue .. '\31' .. id)
        end
      end
      redis.call('HSET', t, 'blocked', count)
    elseif state == 'queued' then
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
