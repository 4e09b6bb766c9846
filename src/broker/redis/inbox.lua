-- The inbox (prepended to the scripts that store it). push.lua appends a producer's plain
-- tasks (priority 0, no unique key, due now) to the list `in`: first `@<µs>`, the server's
-- time of the push, then one entry per task, `<id>\31<args JSON>\31<payload>`; `inn` counts
-- the tasks waiting there. A script stores them as enqueue.lua would have, oldest first,
-- at most `max` entries at a time so that no script holds the server for long; `inat`
-- keeps the time of the batch a step ended in. An entry whose id is already stored (a
-- caller that reused an id) is not stored: it goes to the list `dup`.
-- Returns how many entries it took.
local function store_inbox(p, max)
  local entries = redis.call('LRANGE', p .. 'in', 0, max - 1)
  if #entries == 0 then return 0 end
  local queue = string.match(p, '{q:(.*)}')
  local pushed = tonumber(redis.call('GET', p .. 'inat') or '0')
  local created = fmt(math.floor(pushed / 1000))
  local last = tonumber(redis.call('GET', p .. 'seq') or '0')
  local idx, ready = {}, {}
  local tasks = 0
  for _, e in ipairs(entries) do
    if string.byte(e, 1) == 64 then -- '@'
      pushed = tonumber(string.sub(e, 2))
      created = fmt(math.floor(pushed / 1000))
    else
      tasks = tasks + 1
      local a = string.find(e, '\31', 1, true)
      local b = string.find(e, '\31', a + 1, true)
      local id = string.sub(e, 1, a - 1)
      local t = p .. 't:' .. id
      if redis.call('EXISTS', t) == 0 then
        -- Ordered by when it was pushed, as if stored then.
        local seq = pushed
        if seq <= last then seq = last + 1 end
        last = seq
        local sseq = fmt(seq)
        local rk = string.rep('0', 17 - #sseq) .. sseq .. ':' .. id
        redis.call('HSET', t, 'id', id, 'queue', queue, 'state', 'queued',
          'payload', string.sub(e, b + 1), 'args', string.sub(e, a + 1, b - 1),
          'priority', '0', 'run_at', created, 'attempts', '0', 'created_at', created,
          'updated_at', created, 'cancel_requested', '0', 'token', '0', 'seq', sseq, 'rk', rk)
        idx[#idx + 1] = sseq
        idx[#idx + 1] = id
        ready[#ready + 1] = '0'
        ready[#ready + 1] = rk
      else
        redis.call('RPUSH', p .. 'dup', e)
      end
    end
  end
  for i = 1, #idx, 2000 do
    local j = math.min(i + 1999, #idx)
    redis.call('ZADD', p .. 'st:queued', unpack(idx, i, j))
    redis.call('ZADD', p .. 'all', unpack(idx, i, j))
    redis.call('ZADD', p .. 'ready', unpack(ready, i, j))
  end
  redis.call('LTRIM', p .. 'in', #entries, -1)
  redis.call('SET', p .. 'inat', fmt(pushed))
  redis.call('DECRBY', p .. 'inn', tasks)
  redis.call('SET', p .. 'seq', fmt(last))
  return #entries
end
