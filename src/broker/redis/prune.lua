-- Delete finished tasks whose keep ran out (broker rule 18), oldest finish first within
-- each rule, at most ARGV[1] in all. ARGV: limit, then per rule: state, before (ms; a task
-- that finished strictly before it is due). The due tasks are read from `fin:<state>`
-- (scored by finish time) with ZRANGEBYSCORE … LIMIT: never a scan.
-- Returns per rule how many were deleted, then 1 if more were due, else 0.
local p = KEYS[1]
local left = tonumber(ARGV[1])
local out = {}
local more = 0
for i = 2, #ARGV, 2 do
  local state, before = ARGV[i], ARGV[i + 1]
  local fin = p .. 'fin:' .. state
  local n = 0
  if left > 0 then
    local ids = redis.call('ZRANGEBYSCORE', fin, '-inf', '(' .. before, 'LIMIT', 0, left)
    for _, id in ipairs(ids) do
      local t = p .. 't:' .. id
      local f = redis.call('HMGET', t, 'state', 'unique_key', 'fkey')
      if f[1] == state and redis.call('HEXISTS', p .. 'pin', id) == 1 then
        -- A parent with a dependant not finished (rule 13) leaves the index until its last
        -- dependant finishes, which puts it back (move_state).
      elseif f[1] == state then
        free_unique(p, id, f[2])
        -- A `unique_for` hold that ran out (the task was not due before) names it in `uf`.
        if f[2] then
          local held = redis.call('HGET', p .. 'uf', f[2])
          if held and string.match(held, '^%d+:(.*)$') == id then
            redis.call('HDEL', p .. 'uf', f[2])
          end
        end
        -- Out of its concurrency key's holder set (rule 19): a claim trims the set only
        -- when it reads the key again, which a key whose tasks are all gone never has.
        if f[3] then redis.call('SREM', p .. 'kh:' .. f[3], id) end
        redis.call('DEL', t, p .. 'h:' .. id, p .. 'r:' .. id)
        redis.call('ZREM', p .. 'st:' .. state, id)
        redis.call('ZREM', p .. 'all', id)
        redis.call('ZREM', p .. 'exp', id)
        n = n + 1
      end
      -- An entry whose task moved on (or is gone) only leaves the index.
      redis.call('ZREM', fin, id)
    end
    left = left - #ids
  end
  if left <= 0 and more == 0 then
    local next = redis.call('ZRANGEBYSCORE', fin, '-inf', '(' .. before, 'LIMIT', 0, 1)
    if #next > 0 then more = 1 end
  end
  out[#out + 1] = n
end
out[#out + 1] = more
return out
