-- One step of a schedule's record (rule 10 of the broker trait), atomically. KEYS[1] is the
-- prefix of the schedule's queue: the record (`sch:<name>`, a hash) and its slot records
-- (`schlog:<name>`, a list of JSON, newest first, at most 500) live under the queue's hash
-- tag, with the tasks, so that the check, the task and the record change in one script.
-- ARGV[1] is the step:
--   begin  name spec through
--   fire   name spec slot caught_up(0/1) skip_if_running(0/1) node id payload args priority ukey fkey rkey
--   skip   name spec first last count reason node
--   manual name id payload args priority fkey rkey
-- (fkey, rkey: the task's concurrency and rate key values, '' = none, else 'k:' .. key)
-- Returns {'begun', '0'|'1'} | {'fired', id, existing(0/1)} | {'skipped', running id or ''}
--       | {'handled', through, spec} | {'manual', id}.
local p = KEYS[1]
local queue = string.match(p, '{q:(.*)}')
local op, name = ARGV[1], ARGV[2]
local sk = p .. 'sch:' .. name
local log = p .. 'schlog:' .. name
local now, now_us = clock()

-- Store one queued task as enqueue.lua does (its fields, indexes and unique key), marked
-- with the schedule and slot; a waiting or running holder of the unique key is returned
-- instead. Returns id, existing.
local function add_task(id, payload, args, priority, ukey, slot, fkey, rkey)
  if ukey ~= '' then
    local holder = redis.call('HGET', p .. 'u', ukey)
    if holder then return holder, '1' end
  end
  if redis.call('EXISTS', p .. 't:' .. id) == 1 then
    error('DUPLICATE a task with id ' .. id .. ' already exists')
  end
  local last = tonumber(redis.call('GET', p .. 'seq') or '0')
  local seq = now_us
  if seq <= last then seq = last + 1 end
  redis.call('SET', p .. 'seq', fmt(seq))
  local sseq = fmt(seq)
  local rk = string.format('%017.0f', seq) .. ':' .. id
  local t = p .. 't:' .. id
  redis.call('HSET', t, 'id', id, 'queue', queue, 'state', 'queued', 'payload', payload,
    'args', args, 'priority', priority, 'run_at', fmt(now), 'attempts', '0',
    'created_at', fmt(now), 'updated_at', fmt(now), 'cancel_requested', '0', 'token', '0',
    'seq', sseq, 'rk', rk, 'schedule', name)
  if slot ~= '' then redis.call('HSET', t, 'slot', slot) end
  if fkey and fkey ~= '' then redis.call('HSET', t, 'fkey', string.sub(fkey, 3)) end
  if rkey and rkey ~= '' then redis.call('HSET', t, 'rkey', string.sub(rkey, 3)) end
  if ukey ~= '' then
    redis.call('HSET', t, 'unique_key', ukey)
    redis.call('HSET', p .. 'u', ukey, id)
  end
  redis.call('ZADD', p .. 'st:queued', sseq, id)
  redis.call('ZADD', p .. 'all', sseq, id)
  redis.call('ZADD', p .. 'ready', fmt(-tonumber(priority)), rk)
  redis.call('PUBLISH', 'taskd:wake', 'work')
  return id, '0'
end

if op == 'manual' then
  local id, existing = add_task(ARGV[3], ARGV[4], ARGV[5], ARGV[6], '', '', ARGV[7], ARGV[8])
  return { 'manual', id }
end

local f = redis.call('HMGET', sk, 'spec', 'through', 'last_task')
local spec = f[1] or ''
local through = tonumber(f[2] or '0')
local spec_asked = ARGV[3]

if op == 'begin' then
  if spec == spec_asked then return { 'begun', '0' } end
  local t = math.max(through, tonumber(ARGV[4]))
  redis.call('HSET', sk, 'spec', spec_asked, 'through', fmt(t))
  redis.call('HDEL', sk, 'last_task')
  return { 'begun', '1' }
end

local slot = tonumber(ARGV[4])
if op == 'skip' then slot = tonumber(ARGV[5]) end
if spec ~= spec_asked or slot <= through then
  return { 'handled', fmt(through), spec }
end

local record
local answer
if op == 'fire' then
  local caught_up, skip_if_running, node = ARGV[5], ARGV[6], ARGV[7]
  local running = nil
  if skip_if_running == '1' and f[3] then
    local st = redis.call('HGET', p .. 't:' .. f[3], 'state')
    if st == 'scheduled' or st == 'queued' or st == 'running' or st == 'retrying' then
      running = f[3]
    end
  end
  if running then
    redis.call('HINCRBY', sk, 'skipped', 1)
    record = { slot = fmt(slot), first = fmt(slot), count = '1', outcome = 'skipped',
      task = running, reason = 'overlap: the previous run ' .. running ..
        ' is still waiting or running (`overlap = "skip"`)', at = fmt(now), node = node }
    answer = { 'skipped', running }
  else
    local id, existing = add_task(ARGV[8], ARGV[9], ARGV[10], ARGV[11], ARGV[12], fmt(slot), ARGV[13], ARGV[14])
    redis.call('HSET', sk, 'last_task', id)
    local outcome = 'fired'
    if caught_up == '1' then outcome = 'caught_up' end
    redis.call('HINCRBY', sk, outcome, 1)
    record = { slot = fmt(slot), first = fmt(slot), count = '1', outcome = outcome,
      task = id, at = fmt(now), node = node }
    answer = { 'fired', id, existing }
  end
else
  local first, count, reason, node = ARGV[4], ARGV[6], ARGV[7], ARGV[8]
  redis.call('HINCRBY', sk, 'skipped', tonumber(count))
  record = { slot = fmt(slot), first = first, count = count, outcome = 'skipped',
    reason = reason, at = fmt(now), node = node }
  answer = { 'skipped', '' }
end
redis.call('HSET', sk, 'through', fmt(slot), 'spec', spec)
redis.call('LPUSH', log, cjson.encode(record))
redis.call('LTRIM', log, 0, 499)
return answer
