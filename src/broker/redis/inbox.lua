-- The inbox (prepended to the scripts that store it). push.lua appends a producer's plain
-- tasks (priority 0, no unique key, due now) to the list `in`: first `@<seq>:<ms>` (the
-- first of the seq values the push reserved for its tasks, and the server's time of the
-- push), then one entry per task, `<id>\31<args JSON>\31<payload>`; `inn` counts the tasks
-- waiting there. A script stores them as enqueue.lua would have, oldest first, at most
-- `max` entries at a time so that no script holds the server for long; `inat` keeps the
-- next seq and the time of the batch a step ended in. An entry whose id is already stored
-- (a producer that reused an id) goes to the list `dup` instead; one that cannot be read
-- (a producer that bypassed push.lua) to the list `bad`. Either way it leaves the inbox.
-- Returns how many entries it took.
local function store_inbox(p, max)
  local entries = redis.call('LRANGE', p .. 'in', 0, max - 1)
  if #entries == 0 then return 0 end
  local queue = string.match(p, '{q:(.*)}')
  local at = redis.call('GET', p .. 'inat') or '0:0'
  local c = string.find(at, ':', 1, true)
  local seq, created = tonumber(string.sub(at, 1, c - 1)), string.sub(at, c + 1)
  local idx, ready = {}, {}
  local tasks = 0
  for _, e in ipairs(entries) do
    local marker = nil
    if string.byte(e, 1) == 64 then -- '@'
      local m = string.find(e, ':', 2, true)
      if m then marker = tonumber(string.sub(e, 2, m - 1)) end
      if marker then
        seq, created = marker, string.sub(e, m + 1)
      end
    end
    if not marker then
      tasks = tasks + 1
      local a = string.find(e, '\31', 1, true)
      local b = a and string.find(e, '\31', a + 1, true)
      if not b or a == 1 then
        redis.call('RPUSH', p .. 'bad', e)
      else
        local id = string.sub(e, 1, a - 1)
        local t = p .. 't:' .. id
        if redis.call('EXISTS', t) == 0 then
          local sseq = fmt(seq)
          local rk = string.rep('0', 17 - #sseq) .. sseq .. ':' .. id
          redis.call('HSET', t, 'id', id, 'queue', queue, 'state', 'queued',
            'payload', string.sub(e, b + 1), 'args', string.sub(e, a + 1, b - 1),
            'priority', '0', 'run_at', created, 'attempts', '0', 'created_at', created,
            'updated_at', created, 'cancel_requested', '0', 'token', '0', 'seq', sseq,
            'rk', rk)
          idx[#idx + 1] = sseq
          idx[#idx + 1] = id
          ready[#ready + 1] = '0'
          ready[#ready + 1] = rk
        else
          redis.call('RPUSH', p .. 'dup', e)
        end
      end
      seq = seq + 1
    end
  end
  for i = 1, #idx, 2000 do
    local j = math.min(i + 1999, #idx)
    redis.call('ZADD', p .. 'st:queued', unpack(idx, i, j))
    redis.call('ZADD', p .. 'all', unpack(idx, i, j))
    redis.call('ZADD', p .. 'ready', unpack(ready, i, j))
  end
  redis.call('LTRIM', p .. 'in', #entries, -1)
  redis.call('SET', p .. 'inat', fmt(seq) .. ':' .. created)
  if tasks > 0 then redis.call('DECRBY', p .. 'inn', tasks) end
  return #entries
end
