-- What `taskd why` reads of a task's flow control (broker rule 15), changing nothing.
-- ARGV: id, keyed rate (0/1). Returns {fkey or '', rkey or '', tat or '', holder ids...}:
-- the other held tasks of its concurrency key, and its rate limit's TAT (µs).
local p = KEYS[1]
local id, keyed = ARGV[1], ARGV[2] == '1'
local f = redis.call('HMGET', p .. 't:' .. id, 'fkey', 'rkey', 'id')
if not f[3] then return { 'missing' } end
local out = { f[1] and ('k:' .. f[1]) or '', f[2] and ('k:' .. f[2]) or '' }
local key = ''
if keyed then key = f[2] or '' end
out[3] = redis.call('HGET', p .. 'rate', key) or ''
if f[1] then
  local held = {}
  for _, h in ipairs(redis.call('SMEMBERS', p .. 'kh:' .. f[1])) do
    local score = redis.call('ZSCORE', p .. 'held', h)
    if score and h ~= id then
      held[#held + 1] = { tonumber(redis.call('HGET', p .. 't:' .. h, 'seq') or '0'), h }
    end
  end
  table.sort(held, function(a, b) return a[1] < b[1] end)
  for _, h in ipairs(held) do out[#out + 1] = h[2] end
end
return out
